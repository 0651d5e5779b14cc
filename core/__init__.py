"""Brain-tumour MRI classification: data, preprocessing, models, training, evaluation, inference."""
